from cmdfed.cli import main

main()
