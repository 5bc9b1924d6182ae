"""The standard DeepLens outputs: the project-stream FIFO (:mod:`.fifo`) and the IoT topic
(:mod:`.iot`), behind :class:`.base.Output`."""
