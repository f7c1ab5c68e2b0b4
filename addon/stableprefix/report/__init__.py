"""The offline report: its model, the readers (JSONL, flow file, HAR), the text and HTML renderings."""
