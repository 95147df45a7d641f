from kdrun.cli import entry

if __name__ == "__main__":  # not when a spawned rank imports this module (kdrun.dist)
    entry()
