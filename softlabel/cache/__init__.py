"""The Zarr store of teacher outputs: schema, codecs, the shard-owning writer and the reader."""
