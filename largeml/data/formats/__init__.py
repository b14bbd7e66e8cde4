"""One converter per input format, each `convert(path, output, options, source, progress) ->
ShardIndex` (`common.Options` holds every option; `largeml.data.convert.convert` checks them
and picks the module): `libsvm`, `csv`, `npy`, `parquet`. `common` holds what they share."""
