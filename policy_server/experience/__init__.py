"""Experience logging: the decisions served, and the rewards and ends posted for them, written
as Parquet (records.py says what is written where) and exported as a Minari dataset."""
