"""The cloud buffer: health-checked idle hosts, sized by a linear program (OR-Tools GLOP)."""
