from sealfs.cli import main

main()
