from ingest.cli import PROG, main
from sidrank.cli import run_main

run_main(main, PROG)
