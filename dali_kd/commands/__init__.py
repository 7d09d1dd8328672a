"""The commands a user runs (`python -m dali_kd.train`, `.shard`, `.export`, `.fetch`, `.report`, `.scan`, `.tune`),
the demo's preparation and the argument parser they share — apart from the library parts they call.

`dali_kd/<command>.py` at the package's top level only forwards `python -m dali_kd.<command>` here.
"""
