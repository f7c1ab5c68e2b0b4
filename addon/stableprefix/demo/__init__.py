"""What `stableprefix demo` needs at run time: a Claude-Code-shaped session and a small upstream."""
