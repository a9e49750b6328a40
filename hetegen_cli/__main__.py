from hetegen_cli.cli import main

main()
