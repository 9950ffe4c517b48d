"""All of Nephos's rules. No FastAPI, no global settings, no commits."""
