// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AgentRegistryBase, IAgentIdentity} from "./AgentRegistryBase.sol";
import {MeshStaking} from "./MeshStaking.sol";

/// @title SpotCheckQuorum: staked validators decide spot checks by commit-reveal majority; the loser pays.
/// @notice A reporter opens a check on a stage's committed work (`receiptHash`, e.g. the hash of the stage's
///         signed statement) with a bond; the stage's stake is frozen. `seedDelay` blocks later anyone draws
///         `quorumSize` validators: the seed is the hash of a block that did not exist when the check was opened,
///         mixed with the receipt hash, and each eligible validator's score is keccak(seed, agentId); the lowest
///         scores sit. Eligible: registered and stake raised before the check was opened, at least
///         `minValidatorStake`, not the stage, and for a fast-mode check the stage's device signature.
///         Validators commit keccak(checkId, round, agentId, fail, salt), then reveal; a strict majority of the
///         quorum decides (otherwise the round is inconclusive). During `appealWindow` anyone may appeal with a
///         bond: a fresh, larger quorum (no first-round member) decides again, and its decisive outcome is final.
///         On execution a failed stage loses `stageSlashBps` of its stake (`reporterShareBps` of that to the
///         reporter, the rest to the treasury); every validator that voted against the final outcome or did not
///         reveal loses `validatorSlashBps` of its stake (to the treasury); the report bond is returned unless
///         the stage passed, and then goes to the validators who passed it.
contract SpotCheckQuorum is AgentRegistryBase {
    using SafeERC20 for IERC20;

    enum Outcome {
        None,
        Passed,
        Failed,
        Inconclusive
    }

    struct Params {
        uint8 quorumSize; // odd
        uint8 appealQuorumSize; // odd, larger
        uint16 stageSlashBps; // of the stage's slashable stake, on a failed check
        uint16 reporterShareBps; // of what the stage loses, to the reporter
        uint16 validatorSlashBps; // of a wrong or silent validator's slashable stake
        uint32 seedDelay; // blocks from opening (or appeal) to the seed block
        uint32 commitWindow; // seconds, from the draw
        uint32 revealWindow; // seconds, after the commit window
        uint32 appealWindow; // seconds, after round 0 is tallied
        uint96 minValidatorStake;
        uint96 reportBond;
        uint96 appealBond;
    }

    struct Validator {
        bytes32 device;
        uint64 registeredAt; // block
        uint32 index; // position + 1 in _validatorIds; 0: not registered
    }

    struct Round {
        uint64 anchorBlock; // candidates must have registered and raised their stake before this block
        uint64 seedBlock;
        uint64 commitDeadline; // 0 until drawn
        uint64 revealDeadline;
        uint8 size;
        uint8 commits;
        uint8 reveals;
        uint8 passVotes;
        uint8 failVotes;
        Outcome outcome;
        uint256[] members; // by ascending score
    }

    struct Check {
        uint256 stageAgentId;
        bytes32 receiptHash;
        bytes32 device;
        address reporter;
        bool exact;
        uint8 round; // 0, or 1 once appealed
        bool executed;
        Outcome finalOutcome;
        uint64 finalizedAt; // when round 0 was tallied: the appeal window starts
        address appellant;
        uint96 bond;
        uint96 appealBond;
    }

    uint256 public constant MAX_VALIDATORS = 256;
    uint256 public constant MAX_QUORUM = 15;
    uint256 private constant BPS = 10_000;
    // A revealed vote replaces its commitment in storage (a keccak output is never 1 or 2).
    bytes32 private constant REVEALED_PASS = bytes32(uint256(1));
    bytes32 private constant REVEALED_FAIL = bytes32(uint256(2));

    MeshStaking public immutable staking;
    IERC20 public immutable token;
    address public immutable treasury;
    uint8 private immutable _quorumSize;
    uint8 private immutable _appealQuorumSize;
    uint16 private immutable _stageSlashBps;
    uint16 private immutable _reporterShareBps;
    uint16 private immutable _validatorSlashBps;
    uint32 private immutable _seedDelay;
    uint32 private immutable _commitWindow;
    uint32 private immutable _revealWindow;
    uint32 private immutable _appealWindow;
    uint96 private immutable _minValidatorStake;
    uint96 private immutable _reportBond;
    uint96 private immutable _appealBond;

    uint256[] private _validatorIds;
    mapping(uint256 agentId => Validator) private _validators;
    mapping(bytes32 checkId => Check) private _checks;
    mapping(bytes32 checkId => mapping(uint256 round => Round)) private _rounds;
    mapping(bytes32 checkId => mapping(uint256 round => mapping(uint256 agentId => bytes32))) private _votes;

    event ValidatorRegistered(uint256 indexed agentId, bytes32 device);
    event ValidatorDeregistered(uint256 indexed agentId);
    event CheckOpened(
        bytes32 indexed checkId, uint256 indexed stageAgentId, address indexed reporter, bytes32 receiptHash,
        bool exact, bytes32 device, uint64 seedBlock
    );
    event SeedRearmed(bytes32 indexed checkId, uint8 round, uint64 seedBlock);
    event QuorumDrawn(bytes32 indexed checkId, uint8 round, bytes32 seed, uint256[] members, uint64 commitDeadline, uint64 revealDeadline);
    event QuorumUnavailable(bytes32 indexed checkId, uint8 round, uint256 eligible, uint256 needed);
    event VoteCommitted(bytes32 indexed checkId, uint8 round, uint256 indexed agentId, bytes32 commitment);
    event VoteRevealed(bytes32 indexed checkId, uint8 round, uint256 indexed agentId, bool fail);
    event RoundFinalized(bytes32 indexed checkId, uint8 round, Outcome outcome, uint8 passVotes, uint8 failVotes);
    event Appealed(bytes32 indexed checkId, address indexed appellant, uint64 seedBlock);
    event ValidatorPenalized(bytes32 indexed checkId, uint8 round, uint256 indexed agentId, uint256 amount, bool revealed);
    event CheckExecuted(bytes32 indexed checkId, uint256 indexed stageAgentId, Outcome outcome, uint256 stageSlashed, uint256 reporterReward);

    error BadParams(string why);
    error NotAgentOperator(address caller, uint256 agentId);
    error ValidatorExists(uint256 agentId);
    error UnknownValidator(uint256 agentId);
    error TooManyValidators();
    error InsufficientValidatorStake(uint256 agentId, uint256 stake, uint256 needed);
    error ZeroReceipt();
    error CheckExists(bytes32 checkId);
    error UnknownCheck(bytes32 checkId);
    error NotStaked(uint256 agentId);
    error AlreadyDrawn(bytes32 checkId, uint8 round);
    error NotDrawn(bytes32 checkId, uint8 round);
    error SeedNotReady(uint64 seedBlock);
    error NotSelected(bytes32 checkId, uint256 agentId);
    error BadCommitment();
    error AlreadyCommitted(uint256 agentId);
    error CommitClosed(uint64 commitDeadline);
    error RevealNotOpen(uint64 commitDeadline);
    error RevealClosed(uint64 revealDeadline);
    error NotCommitted(uint256 agentId);
    error AlreadyRevealed(uint256 agentId);
    error CommitmentMismatch(uint256 agentId);
    error AlreadyFinalized(bytes32 checkId, uint8 round);
    error TallyNotReady(uint64 revealDeadline);
    error NotFinalized(bytes32 checkId);
    error AppealClosed(uint64 until);
    error AlreadyAppealed(bytes32 checkId);
    error AppealWindowOpen(uint64 until);
    error AlreadyExecuted(bytes32 checkId);

    constructor(address identityRegistry, MeshStaking staking_, address treasury_, Params memory p)
        AgentRegistryBase(identityRegistry)
    {
        if (p.quorumSize == 0 || p.quorumSize % 2 == 0) revert BadParams("quorumSize must be odd");
        if (p.appealQuorumSize <= p.quorumSize || p.appealQuorumSize % 2 == 0 || p.appealQuorumSize > MAX_QUORUM) {
            revert BadParams("appealQuorumSize must be odd, larger than quorumSize and at most 15");
        }
        if (p.stageSlashBps > BPS || p.reporterShareBps > BPS || p.validatorSlashBps > BPS) revert BadParams("bps above 10000");
        if (p.seedDelay == 0) revert BadParams("seedDelay must be at least 1 block");
        if (treasury_ == address(0)) revert BadParams("treasury is zero");
        // Both rounds and the appeal window must end before anything unbonding now can leave (freezing covers
        // the rest, but the bound keeps a check that nobody pushes along from outliving the stake it guards).
        uint256 span = 2 * (uint256(p.commitWindow) + p.revealWindow) + p.appealWindow;
        if (staking_.unbondingDelay() <= span) revert BadParams("unbonding delay must exceed two rounds and the appeal window");
        staking = staking_;
        token = staking_.token();
        treasury = treasury_;
        _quorumSize = p.quorumSize;
        _appealQuorumSize = p.appealQuorumSize;
        _stageSlashBps = p.stageSlashBps;
        _reporterShareBps = p.reporterShareBps;
        _validatorSlashBps = p.validatorSlashBps;
        _seedDelay = p.seedDelay;
        _commitWindow = p.commitWindow;
        _revealWindow = p.revealWindow;
        _appealWindow = p.appealWindow;
        _minValidatorStake = p.minValidatorStake;
        _reportBond = p.reportBond;
        _appealBond = p.appealBond;
    }

    // ---- validator registry -------------------------------------------------------------------

    /// @notice Register an agent (with at least `minValidatorStake` in MeshStaking) as a validator. `device` is
    ///         keccak256 of its device signature: fast-mode checks go only to validators with the stage's.
    function registerValidator(uint256 agentId, bytes32 device) external {
        _onlyOperator(agentId);
        if (_validators[agentId].index != 0) revert ValidatorExists(agentId);
        if (_validatorIds.length >= MAX_VALIDATORS) revert TooManyValidators();
        uint256 have = staking.stakeOf(agentId);
        if (have < _minValidatorStake) revert InsufficientValidatorStake(agentId, have, _minValidatorStake);
        _validatorIds.push(agentId);
        _validators[agentId] = Validator(device, uint64(block.number), uint32(_validatorIds.length));
        emit ValidatorRegistered(agentId, device);
    }

    /// @notice Leave the registry (a quorum it already sits on still counts its vote, and its stake stays frozen).
    function deregisterValidator(uint256 agentId) external {
        _onlyOperator(agentId);
        uint32 index = _validators[agentId].index;
        if (index == 0) revert UnknownValidator(agentId);
        uint256 lastId = _validatorIds[_validatorIds.length - 1];
        _validatorIds[index - 1] = lastId;
        _validators[lastId].index = index;
        _validatorIds.pop();
        delete _validators[agentId];
        emit ValidatorDeregistered(agentId);
    }

    // ---- a check's life -----------------------------------------------------------------------

    /// @notice Open a check of `stageAgentId`'s work committed as `receiptHash`; pulls the report bond and
    ///         freezes the stage's stake until the check is executed. One check per (stage, receipt).
    function openCheck(uint256 stageAgentId, bytes32 receiptHash, bool exact, bytes32 device)
        external
        returns (bytes32 checkId)
    {
        if (receiptHash == bytes32(0)) revert ZeroReceipt();
        checkId = checkIdOf(stageAgentId, receiptHash);
        Check storage c = _checks[checkId];
        if (c.reporter != address(0)) revert CheckExists(checkId);
        if (staking.slashableOf(stageAgentId) == 0) revert NotStaked(stageAgentId);
        c.stageAgentId = stageAgentId;
        c.receiptHash = receiptHash;
        if (!exact) c.device = device; // only fast mode is matched on it (and an unused slot costs nothing)
        c.reporter = msg.sender;
        c.exact = exact;
        c.bond = _reportBond;
        uint64 seedBlock = _armRound(_rounds[checkId][0], _quorumSize);
        staking.freeze(stageAgentId);
        if (_reportBond > 0) token.safeTransferFrom(msg.sender, address(this), _reportBond);
        emit CheckOpened(checkId, stageAgentId, msg.sender, receiptHash, exact, device, seedBlock);
    }

    /// @notice Seat the current round's quorum once its seed block exists (anyone may call). If the seed block's
    ///         hash is no longer available, the round is re-armed on a new future block instead.
    function draw(bytes32 checkId) external {
        Check storage c = _check(checkId);
        if (c.executed) revert AlreadyExecuted(checkId);
        Round storage r = _rounds[checkId][c.round];
        if (r.commitDeadline != 0 || r.outcome != Outcome.None) revert AlreadyDrawn(checkId, c.round);
        if (block.number <= r.seedBlock) revert SeedNotReady(r.seedBlock);
        // BLOCKHASH covers the last 256 blocks. Past that nobody drew in time (anyone may), so the round waits
        // for a new seed block rather than taking a hash someone could now pick.
        bytes32 h = blockhash(r.seedBlock);
        if (h == bytes32(0)) {
            r.seedBlock = uint64(block.number) + _seedDelay;
            emit SeedRearmed(checkId, c.round, r.seedBlock);
            return;
        }
        bytes32 seed = keccak256(abi.encode(h, c.receiptHash, checkId, c.round));
        (uint256[] memory members, uint256 found) = _select(checkId, c, r, seed);
        if (found < r.size) {
            // Not enough eligible validators: nothing can be decided, so nobody is punished.
            r.outcome = Outcome.Inconclusive;
            emit QuorumUnavailable(checkId, c.round, found, r.size);
            _execute(checkId, c);
            return;
        }
        for (uint256 i = 0; i < members.length; ++i) {
            r.members.push(members[i]);
            staking.freeze(members[i]);
        }
        r.commitDeadline = uint64(block.timestamp) + _commitWindow;
        r.revealDeadline = r.commitDeadline + _revealWindow;
        emit QuorumDrawn(checkId, c.round, seed, members, r.commitDeadline, r.revealDeadline);
    }

    /// @notice A seated validator's hidden vote: keccak256(abi.encode(checkId, round, agentId, fail, salt)).
    ///         The commitment names the voter, so copying another validator's commitment cannot be revealed.
    function commitVote(bytes32 checkId, uint256 agentId, bytes32 commitment) external {
        Check storage c = _check(checkId);
        Round storage r = _drawnRound(checkId, c);
        if (block.timestamp > r.commitDeadline) revert CommitClosed(r.commitDeadline);
        _onlyOperator(agentId);
        if (!_isMember(r, agentId)) revert NotSelected(checkId, agentId);
        if (commitment == bytes32(0) || commitment == REVEALED_PASS || commitment == REVEALED_FAIL) revert BadCommitment();
        mapping(uint256 => bytes32) storage votes = _votes[checkId][c.round];
        if (votes[agentId] != bytes32(0)) revert AlreadyCommitted(agentId);
        votes[agentId] = commitment;
        r.commits += 1;
        emit VoteCommitted(checkId, c.round, agentId, commitment);
    }

    /// @notice Reveal a committed vote; opens once every member committed or the commit window closed, so no
    ///         vote is visible while another can still be committed. Anyone holding the salt may submit it.
    function revealVote(bytes32 checkId, uint256 agentId, bool fail, bytes32 salt) external {
        Check storage c = _check(checkId);
        Round storage r = _drawnRound(checkId, c);
        if (r.commits < r.size && block.timestamp <= r.commitDeadline) revert RevealNotOpen(r.commitDeadline);
        if (block.timestamp > r.revealDeadline) revert RevealClosed(r.revealDeadline);
        mapping(uint256 => bytes32) storage votes = _votes[checkId][c.round];
        bytes32 stored = votes[agentId];
        if (stored == bytes32(0)) revert NotCommitted(agentId);
        if (stored == REVEALED_PASS || stored == REVEALED_FAIL) revert AlreadyRevealed(agentId);
        if (commitmentOf(checkId, c.round, agentId, fail, salt) != stored) revert CommitmentMismatch(agentId);
        votes[agentId] = fail ? REVEALED_FAIL : REVEALED_PASS;
        r.reveals += 1;
        if (fail) r.failVotes += 1;
        else r.passVotes += 1;
        emit VoteRevealed(checkId, c.round, agentId, fail);
    }

    /// @notice Tally the current round once every member revealed (or every committed member revealed after
    ///         the commit window), or the reveal window closed. A strict majority of the quorum size decides.
    ///         Round 0 then waits out the appeal window; an appeal round's result is executed at once.
    function finalize(bytes32 checkId) external {
        Check storage c = _check(checkId);
        Round storage r = _drawnRound(checkId, c);
        bool allIn = r.reveals == r.size || (block.timestamp > r.commitDeadline && r.reveals == r.commits);
        if (!allIn && block.timestamp <= r.revealDeadline) revert TallyNotReady(r.revealDeadline);
        if (2 * uint256(r.failVotes) > r.size) r.outcome = Outcome.Failed;
        else if (2 * uint256(r.passVotes) > r.size) r.outcome = Outcome.Passed;
        else r.outcome = Outcome.Inconclusive;
        emit RoundFinalized(checkId, c.round, r.outcome, r.passVotes, r.failVotes);
        if (c.round == 0) c.finalizedAt = uint64(block.timestamp);
        else _execute(checkId, c);
    }

    /// @notice Contest round 0's outcome (any party, with the appeal bond) within the appeal window: a fresh
    ///         `appealQuorumSize` quorum without round 0's members decides again.
    function appeal(bytes32 checkId) external {
        Check storage c = _check(checkId);
        if (c.executed) revert AlreadyExecuted(checkId);
        if (c.round != 0) revert AlreadyAppealed(checkId);
        if (_rounds[checkId][0].outcome == Outcome.None) revert NotFinalized(checkId);
        uint64 until = c.finalizedAt + _appealWindow;
        if (block.timestamp > until) revert AppealClosed(until);
        c.round = 1;
        c.appellant = msg.sender;
        c.appealBond = _appealBond;
        uint64 seedBlock = _armRound(_rounds[checkId][1], _appealQuorumSize);
        if (_appealBond > 0) token.safeTransferFrom(msg.sender, address(this), _appealBond);
        emit Appealed(checkId, msg.sender, seedBlock);
    }

    /// @notice Apply an unappealed round 0 once the appeal window has passed (anyone may call).
    function execute(bytes32 checkId) external {
        Check storage c = _check(checkId);
        if (c.executed) revert AlreadyExecuted(checkId);
        if (c.round != 0 || _rounds[checkId][0].outcome == Outcome.None) revert NotFinalized(checkId);
        uint64 until = c.finalizedAt + _appealWindow;
        if (block.timestamp <= until) revert AppealWindowOpen(until);
        _execute(checkId, c);
    }

    // ---- views --------------------------------------------------------------------------------

    function checkIdOf(uint256 stageAgentId, bytes32 receiptHash) public pure returns (bytes32) {
        return keccak256(abi.encode(stageAgentId, receiptHash));
    }

    function commitmentOf(bytes32 checkId, uint8 round, uint256 agentId, bool fail, bytes32 salt)
        public
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(checkId, round, agentId, fail, salt));
    }

    function getCheck(bytes32 checkId) external view returns (Check memory) {
        return _check(checkId);
    }

    function getRound(bytes32 checkId, uint8 round) external view returns (Round memory) {
        return _rounds[checkId][round];
    }

    /// @notice 0: no vote, 1: committed, 2: revealed (then `fail` is the vote).
    function voteOf(bytes32 checkId, uint8 round, uint256 agentId) external view returns (uint8 state, bool fail) {
        bytes32 v = _votes[checkId][round][agentId];
        if (v == bytes32(0)) return (0, false);
        if (v == REVEALED_PASS) return (2, false);
        if (v == REVEALED_FAIL) return (2, true);
        return (1, false);
    }

    function validators() external view returns (uint256[] memory) {
        return _validatorIds;
    }

    function validatorInfo(uint256 agentId) external view returns (bool registered, bytes32 device, uint64 registeredAt) {
        Validator storage v = _validators[agentId];
        return (v.index != 0, v.device, v.registeredAt);
    }

    function params() external view returns (Params memory) {
        return Params(_quorumSize, _appealQuorumSize, _stageSlashBps, _reporterShareBps, _validatorSlashBps, _seedDelay,
                      _commitWindow, _revealWindow, _appealWindow, _minValidatorStake, _reportBond, _appealBond);
    }

    // ---- internals ----------------------------------------------------------------------------

    function _armRound(Round storage r, uint8 size) private returns (uint64 seedBlock) {
        seedBlock = uint64(block.number) + _seedDelay;
        r.anchorBlock = uint64(block.number);
        r.seedBlock = seedBlock;
        r.size = size;
    }

    /// The `r.size` eligible validators with the lowest keccak(seed, agentId), ascending; `found` may be fewer.
    /// Scores do not depend on who else is registered, so leaving the registry cannot help anyone else in.
    function _select(bytes32 checkId, Check storage c, Round storage r, bytes32 seed)
        private
        view
        returns (uint256[] memory ids, uint256 found)
    {
        uint256 size = r.size;
        ids = new uint256[](size);
        uint256[] memory scores = new uint256[](size);
        uint256 n = _validatorIds.length;
        for (uint256 i = 0; i < n; ++i) {
            uint256 id = _validatorIds[i];
            if (!_eligible(checkId, c, r, id)) continue;
            uint256 score = uint256(keccak256(abi.encode(seed, id)));
            if (found == size && score >= scores[size - 1]) continue;
            uint256 j = found < size ? found++ : size - 1;
            while (j > 0 && scores[j - 1] > score) {
                scores[j] = scores[j - 1];
                ids[j] = ids[j - 1];
                --j;
            }
            scores[j] = score;
            ids[j] = id;
        }
    }

    function _eligible(bytes32 checkId, Check storage c, Round storage r, uint256 id) private view returns (bool) {
        if (id == c.stageAgentId) return false;
        Validator storage v = _validators[id];
        if (v.registeredAt >= r.anchorBlock) return false;
        if (!c.exact && v.device != c.device) return false;
        if (staking.stakeOf(id) < _minValidatorStake || staking.raisedAtBlock(id) >= r.anchorBlock) return false;
        return c.round == 0 || !_isMember(_rounds[checkId][0], id);
    }

    function _isMember(Round storage r, uint256 agentId) private view returns (bool) {
        uint256 n = r.members.length;
        for (uint256 i = 0; i < n; ++i) {
            if (r.members[i] == agentId) return true;
        }
        return false;
    }

    function _execute(bytes32 checkId, Check storage c) private {
        c.executed = true;
        Round storage r0 = _rounds[checkId][0];
        Round storage r1 = _rounds[checkId][1];
        bool appealed = c.round == 1;
        bool appealDecided = appealed && (r1.outcome == Outcome.Passed || r1.outcome == Outcome.Failed);
        Outcome fin = appealDecided ? r1.outcome : r0.outcome;
        c.finalOutcome = fin;

        uint256 toTreasury = 0;
        uint256 stageSlashed = 0;
        uint256 reporterPay = fin == Outcome.Passed ? 0 : c.bond;
        if (fin == Outcome.Failed) {
            uint256 amount = staking.slashableOf(c.stageAgentId) * _stageSlashBps / BPS;
            stageSlashed = staking.slash(c.stageAgentId, amount);
            uint256 reward = stageSlashed * _reporterShareBps / BPS;
            reporterPay += reward;
            toTreasury += stageSlashed - reward;
        }
        staking.unfreeze(c.stageAgentId);

        toTreasury += _settleValidators(checkId, 0, fin);
        if (appealed) toTreasury += _settleValidators(checkId, 1, fin);
        if (fin == Outcome.Passed) toTreasury += _payMajority(checkId, appealDecided ? 1 : 0, c.bond);
        if (appealed) {
            // Refunded when the appeal changed the outcome, or when no appeal quorum could be seated.
            if (r1.outcome != r0.outcome || r1.members.length == 0) _pay(c.appellant, c.appealBond);
            else toTreasury += _payMajority(checkId, 1, c.appealBond);
        }
        _pay(c.reporter, reporterPay);
        _pay(treasury, toTreasury);
        emit CheckExecuted(checkId, c.stageAgentId, fin, stageSlashed, reporterPay);
    }

    /// Slash the round's members who did not reveal, or (when the final outcome is decisive) voted against it;
    /// release every member's stake. Returns what was taken.
    function _settleValidators(bytes32 checkId, uint8 round, Outcome fin) private returns (uint256 taken) {
        Round storage r = _rounds[checkId][round];
        mapping(uint256 => bytes32) storage votes = _votes[checkId][round];
        bool decisive = fin == Outcome.Passed || fin == Outcome.Failed;
        bytes32 right = fin == Outcome.Failed ? REVEALED_FAIL : REVEALED_PASS;
        for (uint256 i = 0; i < r.members.length; ++i) {
            uint256 id = r.members[i];
            bytes32 v = votes[id];
            bool revealed = v == REVEALED_PASS || v == REVEALED_FAIL;
            if (!revealed || (decisive && v != right)) {
                uint256 amount = staking.slashableOf(id) * _validatorSlashBps / BPS;
                uint256 got = staking.slash(id, amount);
                taken += got;
                emit ValidatorPenalized(checkId, round, id, got, revealed);
            }
            staking.unfreeze(id);
        }
    }

    /// Split `amount` among the round's members who voted its (decisive) outcome; returns what is left over.
    function _payMajority(bytes32 checkId, uint8 round, uint256 amount) private returns (uint256 rest) {
        Round storage r = _rounds[checkId][round];
        if (amount == 0) return 0;
        if (r.outcome != Outcome.Passed && r.outcome != Outcome.Failed) return amount;
        bytes32 right = r.outcome == Outcome.Failed ? REVEALED_FAIL : REVEALED_PASS;
        uint256 winners = r.outcome == Outcome.Failed ? r.failVotes : r.passVotes;
        uint256 share = amount / winners;
        rest = amount - share * winners;
        mapping(uint256 => bytes32) storage votes = _votes[checkId][round];
        for (uint256 i = 0; i < r.members.length; ++i) {
            uint256 id = r.members[i];
            if (votes[id] == right) _pay(_payee(id), share);
        }
    }

    /// A validator is paid at its ERC-8004 agent wallet, or its owner when it has none.
    function _payee(uint256 agentId) private view returns (address) {
        address wallet = IAgentIdentity(_identity).getAgentWallet(agentId);
        return wallet != address(0) ? wallet : IAgentIdentity(_identity).ownerOf(agentId);
    }

    function _pay(address to, uint256 amount) private {
        if (amount > 0) token.safeTransfer(to, amount);
    }

    function _check(bytes32 checkId) private view returns (Check storage c) {
        c = _checks[checkId];
        if (c.reporter == address(0)) revert UnknownCheck(checkId);
    }

    function _drawnRound(bytes32 checkId, Check storage c) private view returns (Round storage r) {
        r = _rounds[checkId][c.round];
        if (r.commitDeadline == 0) revert NotDrawn(checkId, c.round);
        if (r.outcome != Outcome.None) revert AlreadyFinalized(checkId, c.round);
    }

    function _onlyOperator(uint256 agentId) private view {
        if (!_isAgentOperator(msg.sender, agentId)) revert NotAgentOperator(msg.sender, agentId);
    }
}
