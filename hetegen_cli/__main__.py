from hetegen_cli.cli.app import main

main()
