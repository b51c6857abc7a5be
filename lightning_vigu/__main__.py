"""``python -m lightning_vigu {fit,validate,test,generate,caption} ...``"""

from lightning_vigu.cli import main

if __name__ == "__main__":
    main()
