"""The corpus format, shared by every layer: names (:mod:`.layout`), the shard writer (:mod:`.writer`) and
reader (:mod:`.reader`)."""
