"""`ctweb`: the terminal client for a ctweb dashboard.

It speaks the verbs of the LXD live-migration article this project grew from (`list`,
`info`, `snapshot`, `restore`, `stop --stateful`, `start`, `move`) against the HTTP API
(docs/API.md) with an API token, and follows long operations live over the operation's
websocket (polling when the websocket is not there). It depends on no other part of ctweb:
it runs on any machine that reaches the dashboard.
"""

__version__ = "1.0"
