from .cli import main

if __name__ == "__main__":  # guarded: the input pipeline's worker processes (spawn) import the main module again
    raise SystemExit(main())
