from demo import main
from sidrank.cli import run_main

run_main(main, "python -m demo")
