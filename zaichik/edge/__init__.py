"""
The broker's network edge: the transport-neutral connection
(L{zaichik.edge.connection}) and the framers of each transport.
"""
