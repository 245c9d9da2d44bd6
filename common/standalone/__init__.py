"""The standalone baseline: one process applies and answers, no replication.

Start with replica.py: its request loop (BankService) and the process (`replica.py --mode
standalone`). The same replica, in multicast mode, is each replica of the multicast architecture
(common/multicast/). client.py is the client: one address answers everything.
"""
