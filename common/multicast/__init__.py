"""The multicast architecture (seed 002, part 1): the client sends every write to every replica.

Its one rule lives in client.py. Its replica is the standalone replica in multicast mode
(common/standalone/replica.py, `replica.py --mode multicast`): each replica applies what reaches
it, and nothing makes the replicas agree, which the lab shows.
"""
