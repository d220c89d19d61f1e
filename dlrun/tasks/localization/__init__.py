"""Object localisation and landmark detection on canvases of one digit: one trainer for both
(it follows data.kind), the notes' squared-error losses, box IoU and landmark distances, drawn
boxes and landmarks."""
