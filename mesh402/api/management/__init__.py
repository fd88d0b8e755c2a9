"""The management API (console port, default 127.0.0.1:3131): mesh status and events, invites (app.py), epoch earnings (earnings.py) and the validation round (validation.py)."""
