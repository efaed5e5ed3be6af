// `tomeserve-sim calibrate`: measures a CostProfile with the real pipeline on the machine it runs on.
#pragma once

#include <string>
#include <vector>

namespace tomeserve::sim {

// Arguments after "calibrate"; returns the exit code (2: usage, 1: runtime error).
int Calibrate(const std::vector<std::string>& args);

}  // namespace tomeserve::sim
