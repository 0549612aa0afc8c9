"""Tools to study a loaded model: `routing` (what the experts do)."""
