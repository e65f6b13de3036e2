"""Generic byte formats with no knowledge of a particular checkpoint format: zip, protobuf wire,
msgpack, torch's pickle dialect and archive. Formats use them; two formats may share one."""
