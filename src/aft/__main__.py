import sys

from .cli import main

# vLLM starts its workers with multiprocessing's spawn method, which imports the main module of the
# parent (`python -m aft` runs this file as __main__): without the guard each worker would run the CLI again.
if __name__ == "__main__":
    sys.exit(main())
