"""The mitmproxy face: the addon hooks, options parsed into settings, the content view, the JSONL log."""
