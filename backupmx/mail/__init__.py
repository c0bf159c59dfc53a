"""The ground floor: what mail *is*, with no I/O.

Addresses, the wire form of a message (CRLF, dot-stuffing, bare-newline
checks), SMTP replies and their classification, domain names with the one
leading-dot rule, host:port pairs and networks. Every stage may import this
package; it imports no stage, no queue and no socket.
"""
