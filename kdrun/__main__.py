from kdrun.cli import main

if __name__ == "__main__":  # not when a spawned rank imports this module (kdrun.dist)
    main()
