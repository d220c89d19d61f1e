from dlrun.cli import main

main()
