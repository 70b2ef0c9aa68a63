"""serve.py's library: the model side (upload decoding, dynamic batching), the HTTP app and its web
page, and the Redis queue that spreads images over workers.
"""
