"""A site that lies or breaks: the server's checks of a reply (validation.py) and simulated attackers (attacks.py).

Flower-free: strategies/sites.py runs the checks on the arrays of each reply
before any strategy aggregates them; clients/site.py runs an attacker's
transform inside the real ClientApp.
"""
