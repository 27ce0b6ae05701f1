from imgen_cli.cli import main

main()
