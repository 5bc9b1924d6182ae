"""Events: what the camera saw, kept. Rules say which detections start an event
(:mod:`.rules`), the tracker turns results into event starts, updates and ends (:mod:`.tracker`),
the recorder keeps a pre-roll of frames and writes each event's snapshots and clip
(:mod:`.recorder`, :mod:`.clip`), and the store keeps them in SQLite and files (:mod:`.store`)."""
