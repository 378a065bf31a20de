"""Where a byte becomes durable: paths, atomic local files, object storage, retries, records."""
