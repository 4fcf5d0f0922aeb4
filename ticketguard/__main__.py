"""Allow `python -m ticketguard`."""

from ticketguard.cli import main

if __name__ == "__main__":
    main()
