"""`python -m broker` is `ota-broker`."""

from broker.cli import main

main()
