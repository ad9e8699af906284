"""AtomicPusher executor: the stock Pusher with an all-or-nothing filesystem push."""
