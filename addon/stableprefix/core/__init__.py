"""The pure core: request shapes, JSON editing, the volatile-field table, rules, fingerprint, streams,
server evidence and the record. No mitmproxy, no sockets, no files beyond a rules file it is asked to read."""
