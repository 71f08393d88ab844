"""The one core: thinking as a pure function (loop), adaptive halting, selection."""
