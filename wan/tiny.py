"""`python -m wan.tiny DIR`: write the tiny checkpoint set (see `wan.testing.tiny`)."""

from .testing.tiny import main

if __name__ == "__main__":
    main()
