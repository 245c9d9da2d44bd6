"""The lab: saldo's proof machine. Start a cluster, run a bank workload against it while breaking
things on purpose, record every operation, and check afterwards that no money was created, lost or
applied twice. See lab.py for the command line and README.md for what a report contains."""
