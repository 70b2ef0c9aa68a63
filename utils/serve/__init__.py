"""serve.py's library: its flags' defaults in one place (settings), the model side: upload decoding,
the model behind one call, dynamic batching (service), the HTTP app and its web page (app, web/),
and the Redis queue that spreads images over workers (redis_queue).
"""
