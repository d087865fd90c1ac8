// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";

/// @title prime's registry of training runs and compute nodes.
/// @notice A buyer creates a run (hardware requirements, discovery URL, masters). Providers
/// register nodes for a run with a stake; validators approve or reject them; a master of the
/// run invites approved nodes, which join the run on chain. Every change emits an event so
/// that the off-chain roles follow the chain with eth_getLogs from a saved block cursor.
///
/// Node lifecycle (one record per node address):
///   None -> Registered -> Approved -> Active -> Left | Ejected
///                     \-> Rejected
///   Registered/Approved/Active -> Left     (leaveRun: deregistering is always possible)
///   Active -> Ejected                        (ejectNode: a master of the run gave up on a dead node)
///   Approved/Active -> Ejected               (reportRevalidationFailure: a validator's re-challenge failed)
///   Registered/Approved/Active -> Released (endRun, lazily: see below)
///   Left/Ejected/Rejected/Released -> stake withdrawable by the provider (withdrawStake)
///
/// Release on read: endRun writes one flag on the run and touches no node, so its gas does not
/// grow with the run's size. A node whose stored status is Registered, Approved or Active and
/// whose run has ended *reads* as Released everywhere (getNode, nodeStatus, and every check of
/// every function), so its stake is withdrawable at once and it may register again, without a
/// leaveRun and without a transaction per node.
///
/// Re-registration: a node whose record is finished (Left, Ejected or Rejected) may register
/// again, for any run, once its stake is back to zero (withdrawn, or slashed away). The stake of
/// an old record is therefore never mixed into a new one, and a node that was rejected for a
/// passing reason can try again by paying a new stake and going through validation again.
///
/// Signatures: both signed digests bind the chain id and this registry's address, so they do
/// not replay across chains or deployments. They have the same shape (five words) but cannot be
/// confused: a registration digest would pass as an invite only for a run whose id is the
/// provider's address, and an invite as a registration only if the master were the node and the
/// provider the address numbered like the run id; neither can exist.
contract PrimeRegistry is AccessControl, ReentrancyGuard {
    bytes32 public constant VALIDATOR_ROLE = keccak256("VALIDATOR_ROLE");

    enum NodeStatus {
        None,
        Registered,
        Approved,
        Rejected,
        Active,
        Left,
        Ejected,
        /// The node's run ended while the node was Registered, Approved or Active (never stored:
        /// computed on read from the run's `ended` flag).
        Released
    }

    /// What the buyer needs per node. Numbers are minimums; gpuMemoryMiB is per GPU;
    /// gpuModel is matched case-insensitively as a substring of the node's model ("" = any);
    /// maxNodes caps the run's active nodes (0 = unlimited).
    struct Requirements {
        uint32 minGpus;
        string gpuModel;
        uint64 minGpuMemoryMiB;
        uint32 minCpuCores;
        uint64 minRamMiB;
        uint64 minDiskGiB;
        uint32 maxNodes;
    }

    /// What a node has. gpuMemoryMiB is the memory of its smallest GPU.
    struct Specs {
        uint32 gpuCount;
        string gpuModel;
        uint64 gpuMemoryMiB;
        uint32 cpuCores;
        uint64 ramMiB;
        uint64 diskGiB;
    }

    struct Run {
        address owner;
        bool ended;
        uint32 nodeCount;
        Requirements requirements;
        string discoveryUri;
        address[] masters;
    }

    struct Node {
        address provider;
        uint64 runId;
        NodeStatus status;
        uint256 stake;
        Specs specs;
        bytes32 reportHash;
    }

    /// Which requirement a node failed (argument of RequirementsNotMet).
    enum Requirement {
        Gpus,
        GpuModel,
        GpuMemory,
        CpuCores,
        Ram,
        Disk
    }

    /// The most a basis-point share can be: 10000 = all of it.
    uint256 public constant MAX_BPS = 10_000;

    uint256 public minStake;
    /// Share of a node's stake, in basis points, that reportRevalidationFailure slashes (default 10 %).
    uint256 public revalidationPenaltyBps;
    /// Number of runs created so far; run ids are 1..runCount (0 means "no run").
    uint256 public runCount;

    mapping(uint256 runId => Run) private _runs;
    mapping(uint256 runId => mapping(address account => bool)) private _isMaster;
    mapping(address node => Node) private _nodes;

    event RunCreated(uint256 indexed runId, address indexed owner, string discoveryUri, address[] masters);
    event MasterAdded(uint256 indexed runId, address indexed master);
    event MasterRemoved(uint256 indexed runId, address indexed master);
    event RunEnded(uint256 indexed runId);
    event NodeRegistered(uint256 indexed runId, address indexed node, address indexed provider, uint256 stake);
    event NodeValidated(
        uint256 indexed runId, address indexed node, address indexed validator, bool approved, bytes32 reportHash
    );
    event NodeJoined(uint256 indexed runId, address indexed node, address indexed master);
    event NodeLeft(uint256 indexed runId, address indexed node);
    event NodeEjected(uint256 indexed runId, address indexed node, address indexed master);
    event StakeWithdrawn(address indexed node, address indexed provider, uint256 amount);
    event NodeSlashed(address indexed node, uint256 amount, uint256 remainingStake);
    event MinStakeChanged(uint256 minStake);
    /// A validator re-challenged a node and it failed: the node is ejected and `penalty` wei of its
    /// stake went to the validator; `reportHash` is the keccak of the failed challenge's report.
    event RevalidationFailed(
        uint256 indexed runId, address indexed node, address indexed validator, bytes32 reportHash, uint256 penalty
    );
    event RevalidationPenaltyChanged(uint256 penaltyBps);

    error ZeroAddress();
    error RunNotFound(uint256 runId);
    error NotRunOwner(uint256 runId, address caller);
    error RunHasEnded(uint256 runId);
    error AlreadyMaster(uint256 runId, address account);
    error NotMaster(uint256 runId, address account);
    error StakeTooLow(uint256 sent, uint256 minStake);
    error NodeAlreadyRegistered(address node, NodeStatus status);
    error InvalidNodeSignature(address node, address signer);
    error NotNodeOperator(address node, address caller);
    error NotAwaitingValidation(address node, NodeStatus status);
    error AlreadyJoined(address node, uint256 runId);
    error NodeNotApproved(address node, NodeStatus status);
    error NodeNotInRun(address node, uint256 runId);
    error InviteExpired(uint64 expiry, uint256 blockTime);
    error InviteNotFromMaster(uint256 runId, address node, address signer);
    error RequirementsNotMet(address node, Requirement requirement);
    error RunFull(uint256 runId, uint32 maxNodes);
    error CannotLeave(address node, NodeStatus status);
    error NodeNotActive(address node, NodeStatus status);
    error StakeLocked(address node, NodeStatus status);
    error NothingToWithdraw(address node);
    error SlashExceedsStake(address node, uint256 amount, uint256 stake);
    error TransferFailed(address to, uint256 amount);
    error NotRevalidatable(address node, NodeStatus status);
    error MissingEvidence(address node);
    error PenaltyTooHigh(uint256 penaltyBps, uint256 maxBps);

    constructor(address admin, uint256 minStake_) {
        if (admin == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        minStake = minStake_;
        emit MinStakeChanged(minStake_);
        revalidationPenaltyBps = 1000;
        emit RevalidationPenaltyChanged(1000);
    }

    // ------------------------------------------------------------------ runs

    function createRun(Requirements calldata req, string calldata discoveryUri, address[] calldata masters)
        external
        returns (uint256 runId)
    {
        runId = ++runCount;
        Run storage run = _runs[runId];
        run.owner = msg.sender;
        run.requirements = req;
        run.discoveryUri = discoveryUri;
        emit RunCreated(runId, msg.sender, discoveryUri, masters);
        for (uint256 i = 0; i < masters.length; i++) {
            _addMaster(runId, run, masters[i]);
        }
    }

    function addMaster(uint256 runId, address master) external {
        _addMaster(runId, _ownedOpenRun(runId), master);
    }

    function removeMaster(uint256 runId, address master) external {
        Run storage run = _ownedOpenRun(runId);
        if (!_isMaster[runId][master]) revert NotMaster(runId, master);
        _isMaster[runId][master] = false;
        address[] storage list = run.masters;
        uint256 last = list.length - 1;
        for (uint256 i = 0; i <= last; i++) {
            if (list[i] == master) {
                list[i] = list[last];
                list.pop();
                break;
            }
        }
        emit MasterRemoved(runId, master);
    }

    /// Ends a run: nobody can register for or join it any more, and every node of the run that was
    /// Registered, Approved or Active reads as Released from now on (stake withdrawable at once).
    /// Constant gas: one storage write, no loop over the run's nodes.
    function endRun(uint256 runId) external {
        _ownedOpenRun(runId).ended = true;
        emit RunEnded(runId);
    }

    // ----------------------------------------------------------------- nodes

    /// Registers `node` for `runId`, paid for and owned by the caller (the provider).
    /// nodeSig: the node key's EIP-191 signature over
    /// keccak256(abi.encode(chainId, registry, provider, node, runId)); it proves the provider holds the node key.
    function registerNode(uint256 runId, address node, Specs calldata specs, bytes calldata nodeSig)
        external
        payable
    {
        if (node == address(0)) revert ZeroAddress();
        _openRun(runId);
        if (msg.value < minStake) revert StakeTooLow(msg.value, minStake);
        Node storage n = _nodes[node];
        NodeStatus status = _statusOf(n);
        if (status != NodeStatus.None && !(_finished(status) && n.stake == 0)) revert NodeAlreadyRegistered(node, status);
        address signer = _recover(keccak256(abi.encode(block.chainid, address(this), msg.sender, node, runId)), nodeSig);
        if (signer != node) revert InvalidNodeSignature(node, signer);

        n.provider = msg.sender;
        n.runId = uint64(runId);
        n.status = NodeStatus.Registered;
        n.stake = msg.value;
        n.specs = specs;
        n.reportHash = bytes32(0);
        emit NodeRegistered(runId, node, msg.sender, msg.value);
    }

    function reportValidation(address node, bool approved, bytes32 reportHash) external onlyRole(VALIDATOR_ROLE) {
        Node storage n = _nodes[node];
        NodeStatus status = _statusOf(n);
        if (status != NodeStatus.Registered) revert NotAwaitingValidation(node, status);
        n.status = approved ? NodeStatus.Approved : NodeStatus.Rejected;
        n.reportHash = reportHash;
        emit NodeValidated(n.runId, node, msg.sender, approved, reportHash);
    }

    /// Joins an approved node to its run with an invite that a master of the run signed:
    /// EIP-191 over keccak256(abi.encode(chainId, registry, runId, node, expiry)). Called by the provider or the node.
    function joinRun(uint256 runId, address node, uint64 expiry, bytes calldata masterSig) external {
        Node storage n = _operatedNode(node);
        Run storage run = _openRun(runId);
        if (n.runId != runId) revert NodeNotInRun(node, runId);
        if (n.status == NodeStatus.Active) revert AlreadyJoined(node, runId);
        if (n.status != NodeStatus.Approved) revert NodeNotApproved(node, n.status);
        if (block.timestamp > expiry) revert InviteExpired(expiry, block.timestamp);
        address master = _recover(keccak256(abi.encode(block.chainid, address(this), runId, node, expiry)), masterSig);
        if (!_isMaster[runId][master]) revert InviteNotFromMaster(runId, node, master);
        _checkRequirements(node, run.requirements, n.specs);
        uint32 maxNodes = run.requirements.maxNodes;
        if (maxNodes != 0 && run.nodeCount >= maxNodes) revert RunFull(runId, maxNodes);

        n.status = NodeStatus.Active;
        run.nodeCount += 1;
        emit NodeJoined(runId, node, master);
    }

    /// Leaves the run (or withdraws a registration that is not active yet); the stake becomes withdrawable.
    function leaveRun(address node) external {
        Node storage n = _operatedNode(node);
        NodeStatus status = _statusOf(n);
        if (status != NodeStatus.Registered && status != NodeStatus.Approved && status != NodeStatus.Active) {
            revert CannotLeave(node, status);
        }
        if (status == NodeStatus.Active) _runs[n.runId].nodeCount -= 1;
        n.status = NodeStatus.Left;
        emit NodeLeft(n.runId, node);
    }

    function ejectNode(uint256 runId, address node) external {
        _existingRun(runId);
        if (!_isMaster[runId][msg.sender]) revert NotMaster(runId, msg.sender);
        Node storage n = _nodes[node];
        if (n.runId != runId) revert NodeNotInRun(node, runId);
        NodeStatus status = _statusOf(n);
        if (status != NodeStatus.Active) revert NodeNotActive(node, status);
        n.status = NodeStatus.Ejected;
        _runs[runId].nodeCount -= 1;
        emit NodeEjected(runId, node, msg.sender);
    }

    /// A validator's re-challenge of an approved or active node failed: the node is ejected from its
    /// run (an active node frees its slot, as with ejectNode) and `revalidationPenaltyBps` of its
    /// stake is slashed and paid to the calling validator, as `slash` pays the calling admin; the
    /// rest stays withdrawable by the provider. `reportHash` (the keccak of the failed report, not
    /// zero) is the evidence: it replaces the node's report hash and is in RevalidationFailed.
    /// Events: NodeEjected (its `master` is the validator), NodeSlashed (when the penalty is not
    /// zero) and RevalidationFailed. Constant gas: no loop.
    function reportRevalidationFailure(address node, bytes32 reportHash)
        external
        onlyRole(VALIDATOR_ROLE)
        nonReentrant
    {
        Node storage n = _nodes[node];
        NodeStatus status = _statusOf(n);
        if (status != NodeStatus.Approved && status != NodeStatus.Active) revert NotRevalidatable(node, status);
        if (reportHash == bytes32(0)) revert MissingEvidence(node);
        uint256 runId = n.runId;
        if (status == NodeStatus.Active) _runs[runId].nodeCount -= 1;
        n.status = NodeStatus.Ejected;
        n.reportHash = reportHash;
        uint256 stake = n.stake;
        uint256 penalty = (stake * revalidationPenaltyBps) / MAX_BPS;
        n.stake = stake - penalty; // effects before the interaction
        emit NodeEjected(runId, node, msg.sender);
        if (penalty != 0) emit NodeSlashed(node, penalty, stake - penalty);
        emit RevalidationFailed(runId, node, msg.sender, reportHash, penalty);
        if (penalty != 0) _pay(msg.sender, penalty);
    }

    /// Pays the node's stake back to its provider once the node is out (Left, Ejected, Rejected, or
    /// Released by the end of its run).
    function withdrawStake(address node) external nonReentrant {
        Node storage n = _operatedNode(node);
        NodeStatus status = _statusOf(n);
        if (!_finished(status)) revert StakeLocked(node, status);
        uint256 amount = n.stake;
        if (amount == 0) revert NothingToWithdraw(node);
        address provider = n.provider;
        n.stake = 0; // effects before the interaction
        emit StakeWithdrawn(node, provider, amount);
        _pay(provider, amount);
    }

    // ----------------------------------------------------------------- admin

    /// Takes `amount` of the node's stake and pays it to the calling admin (the treasury).
    function slash(address node, uint256 amount) external onlyRole(DEFAULT_ADMIN_ROLE) nonReentrant {
        Node storage n = _nodes[node];
        uint256 stake = n.stake;
        if (amount == 0 || amount > stake) revert SlashExceedsStake(node, amount, stake);
        n.stake = stake - amount;
        emit NodeSlashed(node, amount, stake - amount);
        _pay(msg.sender, amount);
    }

    function setMinStake(uint256 minStake_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        minStake = minStake_;
        emit MinStakeChanged(minStake_);
    }

    /// Sets the share of the stake a failed re-validation slashes, in basis points (0 to MAX_BPS).
    function setRevalidationPenaltyBps(uint256 penaltyBps) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (penaltyBps > MAX_BPS) revert PenaltyTooHigh(penaltyBps, MAX_BPS);
        revalidationPenaltyBps = penaltyBps;
        emit RevalidationPenaltyChanged(penaltyBps);
    }

    // ----------------------------------------------------------------- views

    function getRun(uint256 runId) external view returns (Run memory) {
        return _existingRun(runId);
    }

    /// The node's record; its status as it reads now (Released once its run has ended).
    function getNode(address node) external view returns (Node memory n) {
        Node storage stored = _nodes[node];
        n = stored;
        n.status = _statusOf(stored);
    }

    function isMaster(uint256 runId, address account) external view returns (bool) {
        return _isMaster[runId][account];
    }

    function nodeStatus(address node) external view returns (NodeStatus) {
        return _statusOf(_nodes[node]);
    }

    // -------------------------------------------------------------- internal

    /// The node's status as it reads now: a Registered, Approved or Active node of an ended run
    /// is Released (endRun's lazy release).
    function _statusOf(Node storage n) private view returns (NodeStatus status) {
        status = n.status;
        if (
            (status == NodeStatus.Registered || status == NodeStatus.Approved || status == NodeStatus.Active)
                && _runs[n.runId].ended
        ) {
            status = NodeStatus.Released;
        }
    }

    /// Whether a node in `status` is out of its run for good (stake withdrawable, may register again).
    function _finished(NodeStatus status) private pure returns (bool) {
        return status == NodeStatus.Left || status == NodeStatus.Ejected || status == NodeStatus.Rejected
            || status == NodeStatus.Released;
    }

    function _existingRun(uint256 runId) private view returns (Run storage run) {
        run = _runs[runId];
        if (run.owner == address(0)) revert RunNotFound(runId);
    }

    function _openRun(uint256 runId) private view returns (Run storage run) {
        run = _existingRun(runId);
        if (run.ended) revert RunHasEnded(runId);
    }

    function _ownedOpenRun(uint256 runId) private view returns (Run storage run) {
        run = _existingRun(runId);
        if (run.owner != msg.sender) revert NotRunOwner(runId, msg.sender);
        if (run.ended) revert RunHasEnded(runId);
    }

    /// The node's record, if the caller is its provider or the node itself.
    function _operatedNode(address node) private view returns (Node storage n) {
        n = _nodes[node];
        if (n.status == NodeStatus.None || (msg.sender != n.provider && msg.sender != node)) {
            revert NotNodeOperator(node, msg.sender);
        }
    }

    function _addMaster(uint256 runId, Run storage run, address master) private {
        if (master == address(0)) revert ZeroAddress();
        if (_isMaster[runId][master]) revert AlreadyMaster(runId, master);
        _isMaster[runId][master] = true;
        run.masters.push(master);
        emit MasterAdded(runId, master);
    }

    /// EIP-191 signer of a 32-byte digest; address(0) for a malformed signature (never reverts).
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        (signer,,) = ECDSA.tryRecover(MessageHashUtils.toEthSignedMessageHash(digest), signature);
    }

    function _checkRequirements(address node, Requirements storage req, Specs storage specs) private view {
        if (specs.gpuCount < req.minGpus) revert RequirementsNotMet(node, Requirement.Gpus);
        if (!_containsIgnoreCase(bytes(specs.gpuModel), bytes(req.gpuModel))) {
            revert RequirementsNotMet(node, Requirement.GpuModel);
        }
        if (specs.gpuMemoryMiB < req.minGpuMemoryMiB) revert RequirementsNotMet(node, Requirement.GpuMemory);
        if (specs.cpuCores < req.minCpuCores) revert RequirementsNotMet(node, Requirement.CpuCores);
        if (specs.ramMiB < req.minRamMiB) revert RequirementsNotMet(node, Requirement.Ram);
        if (specs.diskGiB < req.minDiskGiB) revert RequirementsNotMet(node, Requirement.Disk);
    }

    /// Whether `needle` occurs in `haystack`, ASCII case-insensitively (empty needle: always).
    /// Mirrored by prime.chain.types.model_matches.
    function _containsIgnoreCase(bytes memory haystack, bytes memory needle) private pure returns (bool) {
        if (needle.length == 0) return true;
        if (needle.length > haystack.length) return false;
        for (uint256 i = 0; i <= haystack.length - needle.length; i++) {
            uint256 j = 0;
            while (j < needle.length && _lower(haystack[i + j]) == _lower(needle[j])) j++;
            if (j == needle.length) return true;
        }
        return false;
    }

    function _lower(bytes1 c) private pure returns (bytes1) {
        return (c >= 0x41 && c <= 0x5A) ? bytes1(uint8(c) + 32) : c;
    }

    function _pay(address to, uint256 amount) private {
        (bool ok,) = payable(to).call{value: amount}("");
        if (!ok) revert TransferFailed(to, amount);
    }
}
