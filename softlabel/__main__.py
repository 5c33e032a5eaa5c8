"""`python -m softlabel` (what `torchrun -m softlabel` runs)."""

from softlabel.cli import main

if __name__ == "__main__":
    main()
