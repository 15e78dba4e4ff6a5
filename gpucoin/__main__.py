from gpucoin.cli.main import main

main()
