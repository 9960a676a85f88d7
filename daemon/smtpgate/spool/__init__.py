"""The durable store of messages: the daemon's side (store.py), the writer
process that makes every write (writer.py), the tables and states
(schema.py) and the reads (queries.py). The only part of smtpgate that
knows SQL."""
