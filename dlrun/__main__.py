from dlrun.entry import main

main()
