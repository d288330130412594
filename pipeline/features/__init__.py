"""Feature caches and the result cache.

Tiers share one interface (`base.Tier`): L1 `memory.MemoryTier`, L2 `rocksdb.RocksDBTier`
(per partition, changelogged: `rocksdb.PartitionedTables`); L3 is a `base.FeatureSource`
(`sources/`). `tiered.FeatureStore` reads through them, `bloom` guards the cold source
against absent keys, `result.ResultCache` holds model outputs.
"""
