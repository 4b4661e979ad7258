"""The web service: the agent API (VMs, TCP) and the admin API (unix socket, or TCP + token).

The web layer only translates HTTP: it validates requests, calls the store or the engine, and
turns their errors into JSON bodies with a message and a code.
"""
