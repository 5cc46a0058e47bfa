from robustkit.cli import main

main()
