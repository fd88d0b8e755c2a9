// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {AgentRegistryBase, IAgentIdentity} from "./AgentRegistryBase.sol";

/// @title MeshStaking: stake in the payment token bound to ERC-8004 agent ids, with unbonding and slashing.
/// @notice Anyone may add stake to an existing agent; only its owner or an approved operator may unbond it, and
///         unbonded stake goes to the agent's owner after `unbondingDelay`. Unbonding stake stays slashable until
///         it is withdrawn, and the slasher (the spot-check quorum, named once by the deployer) can freeze an
///         agent's withdrawals while a check involving it is open, so no party to a check can leave with its stake.
///         A mesh (any bytes32 id, first come) sets its own minimum stake, never below the contract's floor;
///         `meetsMinimum(mesh, agentId)` is what an entry checks before it sends paid work to a node.
contract MeshStaking is AgentRegistryBase {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    struct Stake {
        uint96 active; // counts for minimums and validator eligibility
        uint96 unbonding; // on its way out, still slashable
        uint40 unbondingReadyAt;
        uint24 frozen; // open checks involving the agent; withdrawals wait while > 0
    }

    struct Mesh {
        address admin;
        uint96 minStake;
    }

    IERC20 public immutable token;
    uint64 public immutable unbondingDelay;
    uint96 public immutable minStakeFloor;
    address public immutable deployer;
    address public slasher;

    mapping(uint256 agentId => Stake) private _stakes;
    mapping(uint256 agentId => uint64) private _raisedAtBlock;
    mapping(bytes32 mesh => Mesh) private _meshes;

    event Staked(uint256 indexed agentId, address indexed from, uint256 amount, uint256 active);
    event UnstakeRequested(uint256 indexed agentId, uint256 amount, uint40 readyAt);
    event Rebonded(uint256 indexed agentId, uint256 amount);
    event Withdrawn(uint256 indexed agentId, address indexed to, uint256 amount);
    event Slashed(uint256 indexed agentId, uint256 amount, address indexed by);
    event Frozen(uint256 indexed agentId, uint256 openChecks);
    event Unfrozen(uint256 indexed agentId, uint256 openChecks);
    event SlasherSet(address indexed slasher);
    event MeshCreated(bytes32 indexed mesh, address indexed admin, uint256 minStake);
    event MeshMinStakeSet(bytes32 indexed mesh, uint256 minStake);

    error ZeroAmount();
    error ZeroDelay();
    error UnknownAgent(uint256 agentId);
    error NotAgentOperator(address caller, uint256 agentId);
    error InsufficientStake(uint256 agentId, uint256 active, uint256 wanted);
    error NothingUnbonding(uint256 agentId);
    error UnbondingNotReady(uint40 readyAt);
    error StakeFrozen(uint256 agentId, uint256 openChecks);
    error NotFrozen(uint256 agentId);
    error NotSlasher(address caller);
    error NotDeployer(address caller);
    error SlasherAlreadySet(address slasher);
    error MeshExists(bytes32 mesh);
    error UnknownMesh(bytes32 mesh);
    error NotMeshAdmin(address caller, bytes32 mesh);
    error BelowFloor(uint256 minStake, uint256 floor);

    constructor(address identityRegistry, IERC20 token_, uint64 unbondingDelay_, uint96 minStakeFloor_)
        AgentRegistryBase(identityRegistry)
    {
        if (unbondingDelay_ == 0) revert ZeroDelay();
        token = token_;
        unbondingDelay = unbondingDelay_;
        minStakeFloor = minStakeFloor_;
        deployer = msg.sender;
    }

    /// @notice Name the slasher once (the quorum contract is deployed after this one, so it cannot be a constructor argument).
    function setSlasher(address slasher_) external {
        if (msg.sender != deployer) revert NotDeployer(msg.sender);
        if (slasher != address(0)) revert SlasherAlreadySet(slasher);
        slasher = slasher_;
        emit SlasherSet(slasher_);
    }

    // ---- staking ------------------------------------------------------------------------------

    /// @notice Add `amount` (pulled from the caller) to the agent's active stake.
    function stake(uint256 agentId, uint256 amount) external {
        _owner(agentId);
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[agentId];
        s.active = (uint256(s.active) + amount).toUint96();
        _raisedAtBlock[agentId] = uint64(block.number);
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Staked(agentId, msg.sender, amount, s.active);
    }

    /// @notice Start unbonding `amount`; the delay restarts for everything unbonding.
    function requestUnstake(uint256 agentId, uint256 amount) external {
        _onlyOperator(agentId);
        Stake storage s = _stakes[agentId];
        if (amount == 0) revert ZeroAmount();
        if (amount > s.active) revert InsufficientStake(agentId, s.active, amount);
        s.active -= uint96(amount);
        s.unbonding += uint96(amount);
        s.unbondingReadyAt = uint40(block.timestamp + unbondingDelay);
        emit UnstakeRequested(agentId, amount, s.unbondingReadyAt);
    }

    /// @notice Put everything unbonding back into active stake.
    function rebond(uint256 agentId) external {
        _onlyOperator(agentId);
        Stake storage s = _stakes[agentId];
        uint96 amount = s.unbonding;
        if (amount == 0) revert NothingUnbonding(agentId);
        s.active += amount;
        s.unbonding = 0;
        s.unbondingReadyAt = 0;
        _raisedAtBlock[agentId] = uint64(block.number);
        emit Rebonded(agentId, amount);
    }

    /// @notice Pay out the unbonded stake to the agent's owner once the delay has passed and no check holds it.
    function withdraw(uint256 agentId) external returns (uint256 amount) {
        address owner = _onlyOperator(agentId);
        Stake storage s = _stakes[agentId];
        amount = s.unbonding;
        if (amount == 0) revert NothingUnbonding(agentId);
        if (block.timestamp < s.unbondingReadyAt) revert UnbondingNotReady(s.unbondingReadyAt);
        if (s.frozen > 0) revert StakeFrozen(agentId, s.frozen);
        s.unbonding = 0;
        s.unbondingReadyAt = 0;
        token.safeTransfer(owner, amount);
        emit Withdrawn(agentId, owner, amount);
    }

    // ---- slashing (the quorum) ----------------------------------------------------------------

    /// @notice Take up to `amount` of the agent's stake, active first, then unbonding; sent to the slasher.
    function slash(uint256 agentId, uint256 amount) external returns (uint256 taken) {
        _onlySlasher();
        Stake storage s = _stakes[agentId];
        uint256 fromActive = amount < s.active ? amount : s.active;
        uint256 rest = amount - fromActive;
        uint256 fromUnbonding = rest < s.unbonding ? rest : s.unbonding;
        s.active -= uint96(fromActive);
        s.unbonding -= uint96(fromUnbonding);
        taken = fromActive + fromUnbonding;
        if (taken > 0) {
            token.safeTransfer(msg.sender, taken);
            emit Slashed(agentId, taken, msg.sender);
        }
    }

    function freeze(uint256 agentId) external {
        _onlySlasher();
        Stake storage s = _stakes[agentId];
        s.frozen += 1;
        emit Frozen(agentId, s.frozen);
    }

    function unfreeze(uint256 agentId) external {
        _onlySlasher();
        Stake storage s = _stakes[agentId];
        if (s.frozen == 0) revert NotFrozen(agentId);
        s.frozen -= 1;
        emit Unfrozen(agentId, s.frozen);
    }

    // ---- per-mesh minimum ---------------------------------------------------------------------

    /// @notice Claim a mesh id and set its minimum stake; the caller becomes the mesh's admin.
    function createMesh(bytes32 mesh, uint256 minStake) external {
        if (_meshes[mesh].admin != address(0)) revert MeshExists(mesh);
        if (minStake < minStakeFloor) revert BelowFloor(minStake, minStakeFloor);
        _meshes[mesh] = Mesh(msg.sender, minStake.toUint96());
        emit MeshCreated(mesh, msg.sender, minStake);
    }

    function setMeshMinStake(bytes32 mesh, uint256 minStake) external {
        Mesh storage m = _meshes[mesh];
        if (m.admin == address(0)) revert UnknownMesh(mesh);
        if (m.admin != msg.sender) revert NotMeshAdmin(msg.sender, mesh);
        if (minStake < minStakeFloor) revert BelowFloor(minStake, minStakeFloor);
        m.minStake = minStake.toUint96();
        emit MeshMinStakeSet(mesh, minStake);
    }

    // ---- views --------------------------------------------------------------------------------

    /// @notice Active stake: what counts toward a mesh's minimum and validator eligibility.
    function stakeOf(uint256 agentId) external view returns (uint256) {
        return _stakes[agentId].active;
    }

    /// @notice Active plus unbonding: what a slash can reach.
    function slashableOf(uint256 agentId) external view returns (uint256) {
        Stake storage s = _stakes[agentId];
        return uint256(s.active) + s.unbonding;
    }

    function stakeInfo(uint256 agentId)
        external
        view
        returns (uint256 active, uint256 unbonding, uint40 unbondingReadyAt, uint24 openChecks)
    {
        Stake storage s = _stakes[agentId];
        return (s.active, s.unbonding, s.unbondingReadyAt, s.frozen);
    }

    /// @notice The last block in which the agent's active stake went up (the quorum ignores stake raised after
    ///         a check was opened, so nobody can join a quorum once its seed is known).
    function raisedAtBlock(uint256 agentId) external view returns (uint64) {
        return _raisedAtBlock[agentId];
    }

    function meshInfo(bytes32 mesh) external view returns (address admin, uint256 minStake) {
        Mesh storage m = _meshes[mesh];
        return (m.admin, m.minStake);
    }

    /// @notice The mesh's minimum stake, or the floor for a mesh nobody created.
    function minStakeFor(bytes32 mesh) public view returns (uint256) {
        Mesh storage m = _meshes[mesh];
        return m.admin == address(0) ? minStakeFloor : m.minStake;
    }

    function meetsMinimum(bytes32 mesh, uint256 agentId) external view returns (bool) {
        uint256 active = _stakes[agentId].active;
        return active > 0 && active >= minStakeFor(mesh);
    }

    // ---- internals ----------------------------------------------------------------------------

    function _owner(uint256 agentId) private view returns (address owner) {
        try IAgentIdentity(_identity).ownerOf(agentId) returns (address o) {
            owner = o;
        } catch {
            revert UnknownAgent(agentId);
        }
    }

    function _onlyOperator(uint256 agentId) private view returns (address owner) {
        owner = _owner(agentId);
        if (!_isAgentOperator(msg.sender, agentId)) revert NotAgentOperator(msg.sender, agentId);
    }

    function _onlySlasher() private view {
        if (msg.sender != slasher) revert NotSlasher(msg.sender);
    }
}
